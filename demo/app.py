"""The Gradio demo with the embedded mmstory-small model: `python demo/app.py [--port 7860] [--quantize int4] ...`.

The same as `mmstory demo`; `mmstory serve` adds the JSON API (POST /api/story) on the same server.
"""

import sys

from mmstory.serve.app import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
