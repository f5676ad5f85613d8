"""The reader's form checks: album narrator, invented people, repetition and the per-style rules."""

from mmstory.eval.story_checks import album_narrator, invented_people, repetition, style_check


def test_album_narrator_is_the_teller_not_a_character_speaking():
    assert album_narrator("A boy in the sand. I took a good shot of the sand.")
    assert album_narrator("Here is the dog at the lake.") and album_narrator("We spent the day at the beach.")
    assert not album_narrator('The fox looked up. "I want those grapes," he said. He never got them.')
    assert not album_narrator("The dog ran to the lake and swam until the sun went down.")


def test_invented_people_only_where_the_photo_shows_none():
    plates = ["A table set with plates of food.", "Dishes of fruit on a table."]
    assert invented_people("The family sat down to eat the fruit.", plates)
    assert not invented_people("The fruit waited on the table all day.", plates)
    assert not invented_people("A man ate the fruit.", plates + ["A man eats at a table."])


def test_repetition_counts_repeated_trigrams():
    assert repetition("The dog ran to the lake and swam.") == 0.0
    assert repetition("the dog ran and the dog ran and the dog ran") > 0.4


def test_each_style_rule_can_pass_and_fail():
    assert style_check("Once upon a time, a dog lived by a lake.", "fairy tale") == {"fairy tale": True}
    assert style_check("A dog lived by a lake.", "fairy tale") == {"fairy tale": False}
    assert style_check("The dog curled up by the fire and slept.", "bedtime") == {"bedtime": True}
    assert style_check("The monster screamed! Danger!", "bedtime") == {"bedtime": False}
    assert style_check("The dog ran\nby the lake\nin the sun\nall day long", "poem") == {"poem": True}
    assert style_check("The dog ran by the lake in the sun all day long.", "poem") == {"poem": False}
    assert style_check("The dog ran. It was fun.", audience="children") == {"children": True}
    assert not style_check("The extraordinarily magnificent, unquestionably affectionate retriever contemplated "
                           "everything imaginable.", audience="children")["children"]
    assert style_check("The dog sat alone in the cold rain. Nobody came.", tone="negative") == {"negative": True}
    assert style_check("What a wonderful, happy day! The dog had fun.", tone="negative") == {"negative": False}
    assert style_check("A dog by a lake.") == {}
