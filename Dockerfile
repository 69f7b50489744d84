# One image for every tastebud service (compose.yaml): the web, the GPU worker, light workers.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# The libraries first (a layer that changes rarely), then the code.
COPY pyproject.toml README.md ./
RUN mkdir rating trainer && touch rating/__init__.py trainer/__init__.py app.py \
    && pip install -e '.[scale]' && rm -rf rating trainer app.py
COPY . .
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 tastebud \
    && mkdir -p /data /instance && chown tastebud /data /instance
USER tastebud
ENV TASTEBUD_INSTANCE_PATH=/instance TASTEBUD_STORAGE_ROOT=/data
EXPOSE 5000
CMD ["python", "app.py"]
