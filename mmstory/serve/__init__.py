"""The apps (the [serve] extra): the Gradio demo and the JSON API on one server (`mmstory demo`, `mmstory serve`).
The library (`mmstory`) never imports it.
"""
