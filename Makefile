# The two commands a newcomer needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is a local file on these machines; pip finds it through PIP_FIND_LINKS.
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

$(PY):
	python3 -m venv $(VENV)

.PHONY: install install-test install-serve test demo serve
install: $(PY)
	$(PY) -m pip install -q $(PIP_FLAGS) -e .

install-serve: $(PY)
	$(PY) -m pip install -q $(PIP_FLAGS) -e ".[serve]"

install-test: $(PY)
	$(PY) -m pip install -q $(PIP_FLAGS) -e ".[test]"

test: install-test
	$(PY) -m pytest -q tests

demo: install
	$(PY) scripts/test_vqa.py --image mindone_qwen2vl/assets/demo.jpg --prompt "Describe this image." --max_new_tokens 32

# The OpenAI-compatible server (tiny random-weight model unless ARGS gives --model_name_or_path ...)
serve: install-serve
	$(PY) scripts/serve.py $(ARGS)
