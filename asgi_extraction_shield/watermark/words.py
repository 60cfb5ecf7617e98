"""Built-in word tables of the text-keyed watermarks (no download, no tokenizer).

``WORDS``: moderately frequent English words. ``embmarker`` draws its keyed trigger words
from them (EmbMarker picks triggers in a moderate frequency band, so that a fair share
of ordinary texts holds one while no text is made only of them) and writes its
verification probes with them.

``SYNONYMS``: small groups of words that can stand for one another in most sentences
(no word in two groups). The ``text`` watermark replaces a word of a group by the
member its key chooses for the word's context.
"""

from __future__ import annotations

WORDS: tuple[str, ...] = tuple(
    """
    account action active actual addition address advance advice affair agency agent
    animal answer appeal apple area argument army article artist aspect attack attempt
    author autumn balance bank basis battle beach bean bear beauty bell bench bill birth
    blade block blood board boat bone border bottle bottom box branch bread breath brick
    bridge brother brush budget button cabin cable camera camp canal candle capital car
    card career carpet case castle cause cell chain chair chance channel chapter charge
    chart cheese chest chicken child church circle city claim class clock cloud club coal
    coast coat code coffee coin collar colour column comfort committee company concert
    copper corner cotton council count country courage course court cousin cover cream
    crew crop crowd crown culture cup curtain curve customer cycle damage dance danger
    daughter deal debate debt decade degree desert design desk detail device diamond
    diet dinner direction disease dish distance doctor document door dozen drawer dream
    dress drink driver drum dust duty eagle earth economy edge effort egg election
    element energy engine entry envelope error estate event evidence exam example
    exchange expert eye fabric factory failure faith family farm father fault feather
    feature fence festival fever field figure film finger fire fish flag flame flight
    floor flower fog folder forest fork fortune frame friend fruit fuel furniture gallery
    game garage garden gate gift glass glove goal gold government grain grass guest
    guide guitar habit hair hall hammer harbour harvest hat health heart heat hill
    history hole holiday honey horse hospital hotel hour house hunger ice idea image
    income industry insect island jacket jewel journey judge juice kettle key kitchen
    knee knife ladder lake lamp language lawyer layer leader leaf lesson letter level
    library lift light limit line lion list loan lock machine magazine manager map
    market master meal measure meat medal member memory message metal method middle
    milk mind minute mirror model moment money month moon morning mother motor mountain
    mouse mouth movement music nail nation nature neck needle nerve network news night
    noise north novel number nurse object ocean office oil onion opinion orange order
    organ oven owner page paint palace panel paper parent park party passage passenger
    path patient pattern peace pencil pepper period person piano picture piece pilot
    pipe planet plant plate platform player pocket poem poet point police pool port
    post potato powder power price prince prison problem product profit program project
    proof property pupil purpose puzzle quality quarter queen question rabbit radio rail
    rain range rate reason record region report rice ring river road rock roof room
    root rope rose route rule salt sand school science screen sea season seat secret
    sector seed shape sheep shelf shell ship shirt shoe shop shoulder signal silk silver
    singer sister skill skin sky sleep smile smoke snake snow society soil soldier song
    soup source space speech speed spirit sport spring square stage star station steam
    steel stick stone storm story stream street string student subject sugar summer sun
    supply surface sweater system table tail task tea teacher team temple tennis theory
    thread ticket tiger time title tongue tool tooth topic tower town track trade
    traffic train tree trial trick truck tunnel uncle union unit valley value van
    vehicle victory village violin visitor voice wall war watch water wave wealth
    weather wedding week weight wheel window wine wing winter wire wood wool worker
    world writer yard year youth zone
    """.split()  # noqa: SIM905 (a word list reads best as text)
)

SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("big", "large"),
    ("small", "little"),
    ("huge", "enormous", "vast"),
    ("tiny", "minuscule"),
    ("quickly", "rapidly", "swiftly"),
    ("slowly", "gradually"),
    ("happy", "glad", "cheerful"),
    ("sad", "unhappy"),
    ("angry", "furious"),
    ("very", "really", "quite"),
    ("often", "frequently"),
    ("maybe", "perhaps"),
    ("usually", "typically", "generally"),
    ("almost", "nearly"),
    ("mostly", "largely", "mainly"),
    ("easy", "simple"),
    ("smart", "clever"),
    ("beautiful", "lovely", "pretty"),
    ("ugly", "unsightly"),
    ("rich", "wealthy"),
    ("strong", "powerful", "sturdy"),
    ("weak", "feeble", "frail"),
    ("old", "aged"),
    ("quiet", "silent", "calm"),
    ("loud", "noisy"),
    ("wet", "damp"),
    ("dry", "arid"),
    ("cold", "chilly"),
    ("hot", "warm"),
    ("under", "beneath", "below"),
    ("saw", "noticed", "spotted"),
    ("loved", "adored", "cherished"),
    ("liked", "enjoyed"),
    ("ran", "raced", "dashed"),
    ("flew", "soared"),
    ("walked", "strolled"),
    ("said", "stated", "remarked"),
    ("asked", "inquired"),
    ("begin", "start"),
    ("began", "started"),
    ("ended", "finished", "concluded"),
    ("help", "assist", "aid"),
    ("helped", "assisted", "aided"),
    ("show", "display", "reveal"),
    ("showed", "displayed", "revealed"),
    ("choose", "pick", "select"),
    ("chose", "picked", "selected"),
    ("buy", "purchase"),
    ("bought", "purchased"),
    ("try", "attempt"),
    ("tried", "attempted"),
    ("need", "require"),
    ("needs", "requires"),
    ("use", "employ", "utilize"),
    ("uses", "employs", "utilizes"),
    ("build", "construct"),
    ("built", "constructed"),
    ("answer", "reply", "response"),
    ("problem", "issue", "difficulty"),
    ("mistake", "error", "fault"),
    ("idea", "notion", "concept"),
    ("job", "task", "chore"),
    ("mat", "rug"),
    ("road", "street", "route"),
    ("car", "automobile"),
    ("house", "residence", "dwelling"),
    ("kids", "children"),
    ("friend", "companion", "pal"),
    ("center", "middle", "core"),
    ("important", "significant", "crucial"),
    ("correct", "accurate"),
    ("wrong", "incorrect"),
    ("enough", "sufficient", "adequate"),
    ("whole", "entire", "complete"),
    ("main", "primary", "principal"),
    ("however", "nevertheless", "nonetheless"),
    ("therefore", "thus", "hence"),
    ("although", "though"),
    ("today", "nowadays"),
    ("again", "anew"),
)
