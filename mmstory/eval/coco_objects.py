"""Made-up objects and invented people measured with COCO's 80 object categories and their synonyms (CHAIR's
setting: Rohrbach et al., 2018), kept apart from `mmstory.text`'s object list on purpose: the story picker and the
caption policy use that list, so a metric on it would grade their own selection rule."""

from __future__ import annotations

from collections.abc import Sequence

from mmstory.text import words

# category: surface forms (single words, lower case, singular and plural). Two-word names are matched on their head
# ("fire hydrant" -> hydrant). People are a category of their own, as in COCO.
_CATEGORIES = """
person: person persons people man men woman women boy boys girl girls child children kid kids baby babies guy guys
  lady ladies player players skier skiers surfer surfers skateboarder skateboarders snowboarder snowboarders rider
  riders biker bikers cyclist crowd adult adults teenager toddler family mother father son daughter chef cook
  worker workers officer policeman soldier soldiers tourist tourists pedestrian pedestrians gentleman someone
  batter catcher pitcher umpire couple student students passenger passengers
bicycle: bicycle bicycles bike bikes; car: car cars taxi taxis suv sedan; motorcycle: motorcycle motorcycles motorbike
  motorbikes scooter scooters moped
airplane: airplane airplanes plane planes jet jets airliner airliners aircraft jetliner; bus: bus buses
train: train trains locomotive; truck: truck trucks lorry pickup; boat: boat boats ship ships sailboat canoe kayak
  yacht ferry
traffic_light: stoplight; hydrant: hydrant hydrants; stop_sign: stopsign; meter: meter meters; bench: bench benches
bird: bird birds duck ducks goose geese gull gulls seagull pigeon pigeons parrot swan owl eagle chicken hen
cat: cat cats kitten kittens kitty; dog: dog dogs puppy puppies pup; horse: horse horses pony ponies
sheep: sheep lamb lambs; cow: cow cows cattle bull calf; elephant: elephant elephants; bear: bear bears
zebra: zebra zebras; giraffe: giraffe giraffes
backpack: backpack backpacks; umbrella: umbrella umbrellas parasol; handbag: handbag handbags purse
tie: necktie; suitcase: suitcase suitcases luggage; frisbee: frisbee frisbees; skis: ski skis
snowboard: snowboard snowboards; ball: ball balls football soccer baseball basketball; kite: kite kites
bat: bat bats; glove: glove gloves mitt; skateboard: skateboard skateboards; surfboard: surfboard surfboards
racket: racket rackets racquet
bottle: bottle bottles; wine_glass: glass glasses; cup: cup cups mug mugs; fork: fork forks; knife: knife knives
spoon: spoon spoons; bowl: bowl bowls
banana: banana bananas; apple: apple apples; sandwich: sandwich sandwiches burger hamburger sub
orange: oranges; broccoli: broccoli; carrot: carrot carrots; hot_dog: hotdog hotdogs; pizza: pizza pizzas
donut: donut donuts doughnut doughnuts; cake: cake cakes cupcake cupcakes
chair: chair chairs stool; couch: couch couches sofa sofas; plant: plant plants; bed: bed beds
table: table tables desk; toilet: toilet toilets; tv: tv television monitor; laptop: laptop laptops computer
mouse: mouse; remote: remote remotes controller; keyboard: keyboard keyboards; phone: phone phones cellphone
microwave: microwave microwaves; oven: oven ovens stove; toaster: toaster; sink: sink sinks
refrigerator: refrigerator refrigerators fridge; book: book books; clock: clock clocks; vase: vase vases
scissors: scissors; teddy_bear: teddy; hair_drier: hairdryer; toothbrush: toothbrush toothbrushes
"""


def _parse(text: str) -> dict[str, str]:
    forms: dict[str, str] = {}
    entries: list[str] = []
    for line in text.strip().splitlines():
        if line.startswith(" ") and entries:
            entries[-1] += " " + line.strip()
        else:
            entries += [part.strip() for part in line.split(";") if part.strip()]
    for entry in entries:
        name, _, listed = entry.partition(":")
        for form in listed.split():
            if forms.setdefault(form, name.strip()) != name.strip():
                raise ValueError(f"{form!r} is in two categories")
    return forms


COCO_FORMS: dict[str, str] = _parse(_CATEGORIES)


def coco_objects(text: str) -> list[str]:
    """The COCO categories a text names, one per mention. "orange" counts only as a plural ("oranges"): as a
    singular it is as often the colour; "teddy bear" counts a teddy bear, not a bear."""
    tokens = words(text)
    found = []
    for i, token in enumerate(tokens):
        if token in ("bear", "bears") and i and tokens[i - 1] == "teddy":
            continue
        if token in COCO_FORMS:
            found.append(COCO_FORMS[token])
    return found


def made_up_objects(text: str, references: Sequence[str]) -> list[str]:
    """The text's object mentions that none of the image's references names (CHAIR's hallucinated objects)."""
    allowed = {obj for ref in references for obj in coco_objects(ref)}
    return [obj for obj in coco_objects(text) if obj not in allowed]


def names_person(text: str) -> bool:
    return "person" in coco_objects(text)


def object_rates(texts: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """CHAIR_i (made-up mentions / all mentions), CHAIR_s (share of texts with one), and the share of texts that
    bring in a person where no reference names one (over those images)."""
    mentions = sum(len(coco_objects(t)) for t in texts)
    made_up = [made_up_objects(t, refs) for t, refs in zip(texts, references)]
    nobody = [i for i, refs in enumerate(references) if not any(names_person(r) for r in refs)]
    invented = sum(names_person(texts[i]) for i in nobody)
    return {"chair_i": sum(map(len, made_up)) / mentions if mentions else None,
            "chair_s": sum(bool(m) for m in made_up) / len(texts) if texts else None,
            "invented_person": invented / len(nobody) if nobody else None, "images_without_people": len(nobody)}
