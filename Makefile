PY ?= python3

.PHONY: install test demo
install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,trt]'

# the main job on the built-in default model
demo:
	kvtrace export --arch gpt_neox --fp16 --force

test:
	$(PY) -m pytest -q -rs tests
