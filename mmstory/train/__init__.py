"""The training harness (the [train] extra): one loop (`trainer.Trainer`) running a task, the captioning task
(contrastive + captioners, or the caption decoder's SCST phase) or the story writer's; feature caches, checkpoints and
logs. The library (`mmstory`) never imports it; `mmstory train` and `python -m mmstory.train` run it.
"""
