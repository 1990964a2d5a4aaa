# Thin wrappers around scripts/run.sh (which creates .venv on first use).
.PHONY: test bench check info lint cmake cross ci clean

test:
	bash scripts/run.sh test

bench:
	bash scripts/run.sh bench

check:
	bash scripts/run.sh check

info:
	bash scripts/run.sh info

lint:
	.venv/bin/ruff check .

cmake:
	cmake -S . -B build/cmake -DROPEKERN_CUDA=$$(command -v nvcc >/dev/null && echo ON || echo OFF)
	cmake --build build/cmake -j
	ctest --test-dir build/cmake --output-on-failure

# the CPU kernel harness on aarch64 under qemu-user (needs g++-aarch64-linux-gnu, qemu-user)
cross:
	bash scripts/cpu_cross.sh

ci:
	bash .ci/run

clean:
	rm -rf build .venv *.egg-info ropekern/*.so
