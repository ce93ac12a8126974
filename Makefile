PY ?= python3

.PHONY: install test demo
# CPU torch first: a bare `pip install torch` would pull a multi-GB CUDA build
install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[export,test,trt,trace,serve]'

# the main job on the built-in default model
demo: install
	kvtrace export --arch gpt_neox --fp16 --force

test: install
	$(PY) -m pytest -q -rs tests
