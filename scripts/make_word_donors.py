"""Write mmstory/resources/word_donors.json: for every ImageNet caption word (mmstory.imagenet_words), the known
caption nouns (mmstory.text's object list, one token each in mmstory-small's fitted vocabulary) ranked by cosine
similarity under all-MiniLM-L6-v2, the packaged text encoder. Run once when the word table changes:

    python scripts/make_word_donors.py
"""

from __future__ import annotations

import json

import torch

from mmstory.imagenet_words import imagenet_words
from mmstory.model import StoryModel
from mmstory.open_vocabulary import DONOR_RANK, DONORS_FILE, _compact_word
from mmstory.text import _OBJECT_TEXT, CREATURE_GROUPS, OBJECT_FORMS, _parse_objects

KEEP = 5
# caption nouns a word may borrow from: the object list's group names (not its adjectives, "snowy", or its sports,
# which captions use as modifiers, "a rugby player") and the people words a caption's subject usually is
PEOPLE = ("man", "woman", "boy", "girl", "people", "player")
NOT_DONORS = frozenset({"tennis", "hockey", "golf", "football", "basketball", "baseball", "volleyball", "rugby",
                        "treasure", "mud", "fire"})
# where the encoder's nearest noun is a false friend
OVERRIDES = {"hot dog": ["food"]}
PERSON_CLASSES = frozenset({981, 982, 983})  # ballplayer, groom, scuba diver
ANIMALS = 398  # ImageNet-1k's animal classes come first


def main() -> int:
    model = StoryModel.from_pretrained("mmstory-small")
    decoder, tokenizer = model.caption_decoder, model.tokenizer
    # things borrow from things a caption sees (not from its places, "kitchen": "A stove" would go on like a room)
    places = set(_parse_objects(_OBJECT_TEXT.split("# places and scenery")[1]).values())
    nouns = (set(OBJECT_FORMS.values()) | set(PEOPLE)) - NOT_DONORS - places
    known = sorted(w for w in nouns if _compact_word(decoder, tokenizer, w, DONOR_RANK) is not None)
    table = imagenet_words()
    words = [w.text for w in table.words]
    with torch.no_grad():
        a = torch.nn.functional.normalize(model.encode_text([f"a {w}" for w in words]), dim=-1)
        b = torch.nn.functional.normalize(model.encode_text([f"a {w}" for w in known]), dim=-1)
    # an animal borrows from an animal, a person from a person, a thing from a thing
    creatures = CREATURE_GROUPS - {"person"}
    kind_of_known = torch.tensor([0 if w in PEOPLE else 1 if w in creatures else 2 for w in known])
    donors = {}
    for i, word in enumerate(table.words):
        kind = (0 if set(word.classes) <= PERSON_CLASSES else 1 if max(word.classes) < ANIMALS else 2)
        cosine = (a[i] @ b.T).masked_fill(kind_of_known != kind, -2.0)
        donors[word.text] = OVERRIDES.get(word.text, [known[j] for j in cosine.topk(KEEP).indices.tolist()
                                                      if kind_of_known[j] == kind])
    DONORS_FILE.write_text(json.dumps(donors, indent=0, sort_keys=True) + "\n")
    print(f"wrote {DONORS_FILE}: {len(donors)} words, {len(known)} known nouns")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
