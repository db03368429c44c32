# One-command set-up: `make run` (server on the embedded default model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# openai-whisper without triton (GPU-only, ~1 GB): its real needs are in requirements.txt.
	$(PY) -m pip install -q --no-deps openai-whisper==20250625
	$(PY) -c "import torch, aiortc, av, dlib, whisper, diffusers, piper"
	touch $(STAMP)

run: $(STAMP)
	$(PY) app.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/latency.py

clean:
	rm -rf $(VENV) data/avatars
