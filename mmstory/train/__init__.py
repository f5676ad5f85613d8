"""The training harness (the [train] extra): the captioning/contrastive Trainer, feature caches, SCST and the story
writer's own loop. The library (`mmstory`) never imports it; `mmstory train` and `python -m mmstory.train` run it.
"""
