"""Evaluation (the [eval] extra): captioning, retrieval and story metrics, the evaluation report and its plots, the
story benchmark and the speed benchmark. The library (`mmstory`) never imports it.
"""
