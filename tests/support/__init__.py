"""curate's test support (the `curate-testkit` distribution, installed by scripts/install.sh with the dev extra):
what the tests and the benchmarks share and curate itself never imports. The sample generator, the toy tool
suite and its runs, the reference implementations, the fake servers, the tiny vision-language model, the stages
the executor tests run, and the subprocess and kill -9 harnesses."""
