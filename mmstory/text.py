"""Text helpers the library itself needs (the story reranker, the answerer) and the metrics build on.

Word tokens are the captioning tokenizer's (`mmstory.ptb`), so a story's words count as the metrics count them.
They live in the core, not in `mmstory.eval`, so that telling a story loads no evaluation package.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from mmstory.ptb import ptb_tokenize

# English function words (close to NLTK's list) and the PTB tokenizer's clitics: what is left is what a picture shows.
_STOPWORD_TEXT = """
a an the and or but nor so if than then too very of in on at to from by with without for into onto upon over under
above below between among through across along around about against behind beside near off out up down after
before during while until again further once as here there this that these those it its he him his she her hers
they them their theirs we us our ours you your yours i me my mine myself who whom whose which what where when why
how all any both each few more most other some such no not only own same can will just should would could may might
must shall is are was were be been being am has have had having do does did doing 's 'm 're 've 'd 'll n't
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
# a sentence ends at . ! or ?, a closing quote or bracket after it, and the space after that; the metrics split
# dropping the closer (what their published numbers were measured with, so it stays)
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+")
_SENTENCE_END_DROPPING_CLOSERS = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def split_sentences(text: str, keep_closers: bool = False) -> list[str]:
    """The one sentence splitter, for the story's cut to whole sentences, its metrics, the content filter's redaction
    and the story data's beats. `keep_closers`: a closing quote or bracket after the period stays with its sentence
    (the story's cut, the filter and the data); without it, it is dropped (the metrics)."""
    pattern = _SENTENCE_END if keep_closers else _SENTENCE_END_DROPPING_CLOSERS
    return [s.strip() for s in pattern.split(text.strip()) if s.strip()]


def words(text: str) -> list[str]:
    """Lower-cased word tokens without punctuation (the captioning tokenizer, so all metrics count alike)."""
    return ptb_tokenize(text)


def shared_content_words(captions: Sequence[str], min_captions: int = 3) -> set[str]:
    """Content words (not stopwords, containing a letter) used by at least `min_captions` of the captions."""
    counts = Counter(w for caption in captions for w in set(words(caption))
                     if w not in STOPWORDS and any(ch.isalpha() for ch in w))
    return {w for w, c in counts.items() if c >= min_captions}


def content_word_recall(text: str, captions: Sequence[str], min_captions: int = 3) -> float | None:
    """Share of the references' shared content words that the text uses; None when the references share none."""
    wanted = shared_content_words(captions, min_captions)
    if not wanted:
        return None
    return len(wanted & set(words(text))) / len(wanted)


# --- objects in stories (CHAIR-style hallucination) ------------------------------------------------------------------
# Concrete things a photo can show, as "canonical: surface forms" (the canonical word is a form too); ";" separates
# groups on a line. Groups are coarse on purpose, as CHAIR's synonym lists are: a story's "lake" on a photo whose
# captions say "water" is not made up, nor its "mother" beside a captioned "woman". Single tokens only: "hot dog"
# counts a dog and "ice cream" ice, rare in both captions and stories. Left out: forms that are as often a verb or a
# figure of speech (stick, leaves, swing, slide, sign, waves, top, suit), body parts (every person has them), and the
# sky, sun and clouds, which nearly every outdoor photo shows and its captions almost never name.
_OBJECT_TEXT = """
# people (one group, as in CHAIR: captions and stories name the same person many ways)
person: persons people man men woman women boy boys girl girls child children kid kids baby babies toddler toddlers
  lady ladies guy guys gentleman adult adults teenager teenagers teen teens youth player players crowd audience team
  friend friends family families mother father mom mum dad parent parents brother brothers sister sisters son sons
  daughter daughters grandmother grandfather grandma grandpa wife husband rider riders biker bikers cyclist cyclists
  skier skiers surfer surfers skateboarder skateboarders snowboarder snowboarders climber climbers swimmer swimmers
  dancer dancers runner runners hiker hikers trainer trainers worker workers tourist tourists spectators
  pedestrians performer performers
  musician musicians singer farmer fisherman policeman officer soldier soldiers prince princess king queen knight
  keeper keepers zookeeper zookeepers owner owners visitor visitors traveler travelers driver drivers pilot pilots
  passenger passengers chef baker customer customers neighbor neighbors stranger strangers guest guests someone somebody
  uncle aunt grandparents
# animals
dog: dogs puppy puppies pup pups hound poodle terrier retriever collie labrador spaniel beagle greyhound dachshund
cat: cats kitten kittens kitty; horse: horses pony ponies foal stallion; cow: cows cattle bull bulls calf calves
sheep: lamb lambs; goat: goats; pig: pigs piglet; donkey: donkeys mule; camel: camels; llama: llamas alpaca
bird: birds duck ducks duckling goose geese swan swans seagull seagulls gull gulls pigeon pigeons parrot owl owls
  eagle hawk crow chicken chickens hen rooster penguin penguins
fish: fishes goldfish; bear: bears; elephant: elephants; giraffe: giraffes; zebra: zebras; lion: lions lioness
tiger: tigers; monkey: monkeys ape gorilla; deer: reindeer; rabbit: rabbits bunny bunnies; squirrel: squirrels
mouse: mice rat rats; snake: snakes; frog: frogs toad; turtle: turtles tortoise; butterfly: butterflies
insect: insects bug bugs bee bees ant ants spider spiders; dolphin: dolphins; whale: whales; shark: sharks
fox: foxes; wolf: wolves; kangaroo: kangaroos; dinosaur: dinosaurs; dragon: dragons; unicorn: unicorns
monster: monsters ghost ghosts; robot: robots; alien: aliens; fairy: fairies
# vehicles and things that carry people
car: cars taxi taxis jeep jeeps suv vehicle vehicles; van: vans; truck: trucks lorry; bus: buses
bike: bikes bicycle bicycles motorcycle motorcycles motorbike motorbikes scooter scooters
boat: boats ship ships canoe canoes kayak kayaks raft rafts sailboat sailboats yacht; train: trains locomotive
airplane: airplanes plane planes jet jets aircraft; helicopter: helicopters; rocket: rockets spaceship
skateboard: skateboards; surfboard: surfboards; snowboard: snowboards; sled: sleds sleigh toboggan
wagon: wagons cart carts; stroller: strollers pram; tractor: tractors; wheelchair: wheelchairs
# sports and play
ball: balls; football: footballs soccer rugby; basketball: basketballs; baseball: baseballs softball
tennis; hockey; golf; volleyball; frisbee: frisbees; racket: rackets racquet; helmet: helmets
kite: kites; balloon: balloons; toy: toys teddy; doll: dolls; trampoline: trampolines; ramp: ramps
rope: ropes; net: nets; leash: leashes; collar: collars; pole: poles
# clothing
shirt: shirts t-shirt t-shirts tshirt blouse; jacket: jackets coat coats vest hoodie sweater sweaters sweatshirt parka
hat: hats cap caps beanie; dress: gown; skirt: skirts; shorts; pants: jeans trousers leggings
shoe: shoes boot boots sneakers sandals; glasses: sunglasses goggles spectacles; uniform: uniforms jersey jerseys
costume: costumes mask masks; swimsuit: swimsuits bikini wetsuit; scarf: scarves; glove: gloves mittens
bag: bags backpack backpacks purse handbag suitcase luggage; apron: aprons
# home, furniture and things people hold
chair: chairs stool; bench: benches; table: tables desk desks; bed: beds; couch: couches sofa sofas
door: doors doorway; window: windows; stairs: staircase stairway steps; wall: walls
fence: fences railing railings gate gates; roof: roofs; lamp: lamps lantern lanterns; tv: television
computer: computers laptop laptops; phone: phones cellphone telephone; book: books magazine newspaper
camera: cameras; clock: clocks; mirror: mirrors; umbrella: umbrellas parasol; box: boxes; bottle: bottles
cup: cups mug mugs; plate: plates; bowl: bowls; basket: baskets; bucket: buckets pail; blanket: blankets
pillow: pillows; painting: paintings; flag: flags; tent: tents; map: maps; treasure; sword: swords
crown: crowns; wand: wands; castle: castles palace; statue: statues sculpture sculptures; bridge: bridges
guitar: guitars; drum: drums; piano: pianos; microphone: microphones; violin: violins
# food
food: meal snack snacks; cake: cakes cupcake cupcakes; pizza: pizzas; sandwich: sandwiches; bread
apple: apples; banana: bananas; fruit: fruits; vegetables: vegetable; cookie: cookies; candy: sweets
coffee; tea; wine; beer; egg: eggs; hamburger: hamburgers burger burgers
# places and scenery
beach: beaches shore shores sand sandy seashore coast
water: lake lakes pond ponds river rivers stream streams creek ocean oceans sea seas pool pools puddle puddles
  waterfall waterfalls fountain fountains
snow: snowy snowfall; ice: icy; grass: grassy lawn lawns; field: fields meadow meadows pasture
forest: forests woods wooded jungle; tree: trees bush bushes shrubs; flower: flowers rose roses daisy daisies; leaf
mountain: mountains hill hills hillside peak; rock: rocks rocky boulder boulders stone stones cliff cliffs
street: streets road roads sidewalk sidewalks alley avenue highway crosswalk; path: paths trail trails
city: cities town towns downtown village; park: parks; playground: playgrounds; garden: gardens
yard: yards backyard; kitchen: kitchens; bathroom: bathrooms; bedroom: bedrooms
restaurant: restaurants cafe diner; store: stores shop shops market supermarket; stage: stages
building: buildings skyscraper skyscrapers tower towers; house: houses cabin cottage hut
church: churches; school: schools classroom; farm: farms barn; stadium: stadiums arena; desert: deserts
cave: caves; dock: docks pier piers; tire: tires; mud: muddy; fire: fires campfire bonfire flames
"""


def _parse_objects(text: str) -> dict[str, str]:
    """Surface form -> canonical group from the "canonical: forms" text; a form in two groups is an error."""
    groups: dict[str, list[str]] = {}
    entries: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if line.startswith(" ") and entries:  # a continuation of the previous line's last group
            entries[-1] += " " + line.strip()
        else:
            entries += [part.strip() for part in line.split(";") if part.strip()]
    for entry in entries:
        name, _, forms = entry.partition(":")
        groups[name.strip()] = [name.strip(), *forms.split()]
    lookup: dict[str, str] = {}
    for name, forms in groups.items():
        for form in forms:
            if lookup.setdefault(form, name) != name:
                raise ValueError(f"object form {form!r} is in two groups: {lookup[form]!r} and {name!r}")
    return lookup


OBJECT_FORMS: dict[str, str] = _parse_objects(_OBJECT_TEXT)  # surface form -> canonical object
OBJECT_GROUPS: frozenset[str] = frozenset(OBJECT_FORMS.values())
# the people and animal groups: what a caption's subject usually is
CREATURE_GROUPS: frozenset[str] = frozenset(_parse_objects(_OBJECT_TEXT.split("# vehicles")[0]).values())
# everything but places and scenery: what a caption may name that a classifier could vouch for
THING_GROUPS: frozenset[str] = frozenset(_parse_objects(_OBJECT_TEXT.split("# places")[0]).values())
FOOD_GROUPS: frozenset[str] = frozenset(_parse_objects(_OBJECT_TEXT.split("# food")[1].split("# places")[0]).values())
CLOTHING_GROUPS: frozenset[str] = frozenset(
    _parse_objects(_OBJECT_TEXT.split("# clothing")[1].split("# home")[0]).values())


# the person words a story may not write where no picture shows a person: the person group, and the group nouns,
# trades and pronouns that a writer uses to bring people into a picture of things ("One day, a young couple came in.",
# "The cook added some bread.", "the policeman got back") but a caption never opens with (so the caption policy's
# subject check does not read them). "cook" is a verb too: a story of a stove then says "make" instead. Left out:
# words as often something else ("fan", "host", "judge", "master", "groom", "general", "fellow", "elderly").
PERSON_WORDS: tuple[str, ...] = tuple(sorted({form for form, group in OBJECT_FORMS.items() if group == "person"} | {
    "couple", "couples", "teacher", "teachers", "student", "students", "Mr", "Mrs", "cook", "cooks", "waiter",
    "waiters", "waitress", "watchman", "guard", "guards", "attendant", "attendants", "doctor", "doctors", "nurse",
    "nurses", "postman", "mailman", "shopkeeper", "merchant", "merchants", "sailor", "sailors", "captain", "hunter",
    "hunters", "gardener", "butcher", "cashier", "clerk", "boss", "police", "policemen", "policewoman", "fireman",
    "firemen", "firefighter", "firefighters", "mayor", "servant", "servants", "villager", "villagers", "townspeople",
    "everyone", "everybody", "human", "humans", "cop", "cops", "staff", "crew", "lass", "maid", "maids",
    "nobleman", "noblewoman", "mistress", "witch", "wizard", "thief", "thieves", "robber", "pirate", "pirates",
    "villain", "hero", "heroine", "explorer", "wanderer", "traveller", "citizen", "citizens", "folk", "folks",
    "onlooker", "onlookers", "passerby", "passersby", "bystander", "bystanders", "youngster", "youngsters",
    "boyfriend", "girlfriend", "bride", "widow", "orphan", "cousin", "cousins", "nephew", "niece", "grandson",
    "granddaughter", "grandchild", "grandchildren", "infant", "newborn", "coworker", "coworkers", "colleague",
    "colleagues", "classmate", "classmates", "pupil", "pupils", "professor", "scientist", "scientists", "engineer",
    "engineers", "programmer", "artist", "artists", "painter", "writer", "author", "poet", "jeweler", "shepherd",
    "miller", "hostess", "butler", "nanny", "dentist", "sheriff", "priest", "monk", "nun", "lawyer", "detective",
    "emperor", "empress", "duke", "duchess", "lord", "lords", "madam", "motorist", "motorists", "employee",
    "employees", "manager", "coachman", "inventor", "photographer", "cameraman", "reporter", "journalist", "actor",
    "actress", "athlete", "athletes", "referee", "shopper", "shoppers", "vendor", "vendors", "seller", "buyer",
    "peasant", "peasants", "beggar"}))


# a person's words by sex, pronouns first: a story whose pictures show only one sex keeps to it (GenerationConfig's
# story_cast_from_pictures), since the writer brings in "his mother", "an old man" or swaps "the young girl ... He"
MALE_WORDS: tuple[str, ...] = (
    "he", "him", "his", "himself", "man", "men", "boy", "boys", "father", "fathers", "dad", "daddy", "brother",
    "brothers", "son", "sons", "husband", "boyfriend", "guy", "guys", "gentleman", "gentlemen", "grandfather",
    "grandpa", "king", "prince", "uncle", "nephew", "grandson", "sir", "Mr", "lad", "fellow", "policeman", "fireman",
    "waiter", "actor", "duke", "emperor", "monk", "priest")
FEMALE_WORDS: tuple[str, ...] = (
    "she", "her", "hers", "herself", "woman", "women", "girl", "girls", "mother", "mothers", "mom", "mommy", "mum",
    "sister", "sisters", "daughter", "daughters", "wife", "girlfriend", "lady", "ladies", "grandmother", "grandma",
    "queen", "princess", "aunt", "niece", "granddaughter", "madam", "Mrs", "Miss", "lass", "maid", "policewoman",
    "waitress", "actress", "duchess", "empress", "nun", "bride", "widow", "witch", "heroine", "hostess")


_SEX_FORMS = {sex: {form.lower() for form in forms} for sex, forms in (("male", MALE_WORDS), ("female", FEMALE_WORDS))}


def sexes_named(text: str) -> set[str]:
    """Which of "male" and "female" a text's person words speak of ("A man and his dog" -> {"male"})."""
    said = {w.lower() for w in re.findall(r"[A-Za-z']+", text)}
    return {sex for sex, forms in _SEX_FORMS.items() if said & forms}


def names_person(text: str) -> bool:
    """The text speaks of a person ("a man", "the farmer", "her family")."""
    return "person" in object_mentions(text)


def object_mentions(text: str) -> list[str]:
    """The canonical objects a text names, one per mention, in order (the same `words` tokens as every metric)."""
    return [OBJECT_FORMS[w] for w in words(text) if w in OBJECT_FORMS]


def reference_objects(captions: Sequence[str]) -> set[str]:
    """Objects any of an image's reference captions names: what a story may speak of without making it up."""
    return {obj for caption in captions for obj in object_mentions(caption)}


def hallucinated_mentions(text: str, captions: Sequence[str]) -> list[str]:
    """A text's object mentions that no reference caption of its image names (CHAIR's hallucinated objects)."""
    allowed = reference_objects(captions)
    return [obj for obj in object_mentions(text) if obj not in allowed]
