# microtun — every target sets up what it needs by itself.
#   make test    the suite: CPython, the MicroPython unix port, and (built
#                from MICROPY_SRC, cached) a 32-bit frozen build and qemu Cortex-M3
#   make test-long  the long end-to-end scenarios that `make test` skips
#   make bench   benchmarks (JSON) on both interpreters
#   make demo    a local device -> PoPs -> gateway run over loopback
#   make unix32-frozen / unix32 / qemu   MicroPython built from source with
#                microtun frozen in (tools/mpbuild.py; MICROPY_SRC=checkout or tarball);
#                qemu-pyaes: the qemu board without cryptolib (bench-qemu's pure AES)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MP     := $(VENV)/bin/micropython
STAMP  := $(VENV)/.installed
export MICROPYPATH := $(CURDIR)/lib:.frozen

.PHONY: all setup test test-long bench demo clean

all: test

$(STAMP): requirements-dev.txt pyproject.toml
	@if test -x $(PY); then $(PY) tools/check_python.py; else $(PYTHON) tools/check_python.py; fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@$(MP) -c "import sys; print('micropython', sys.implementation.version)"
	@touch $@

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest host_tests

# The end-to-end scenarios marked long (tens of seconds each), left out of
# `make test` so that it stays near ten minutes on two cores.
test-long: $(STAMP)
	$(PY) -m pytest host_tests --long

# Each benchmark prints one JSON object; ratios are to a floor measured in
# the same run (docs/FIGURES.md).
bench: $(STAMP)
	@echo "== crypto, MicroPython unix port"; $(MP) tools/bench_crypto.py
	@echo "== crypto, CPython";               $(PY) tools/bench_crypto.py
	@echo "== tunnel, MicroPython unix port"; $(MP) tools/bench_tunnel.py
	@echo "== tunnel, CPython";               $(PY) tools/bench_tunnel.py
	@echo "== outer hop MAC, MicroPython";    $(MP) tools/bench_outer.py
	@echo "== PoP forwarding";                $(PY) tools/bench_pop.py
	@echo "== gateway";                       $(PY) tools/bench_gateway.py
	@echo "== paths (real processes, ~3 min)"; $(PY) tools/bench_paths.py
	@echo "== gateway failover (real processes, ~1 min)"; $(PY) tools/bench_failover.py

# Issue 14 (docs/LOOPS.md): local recovery on the PoP-to-PoP segment, every
# mode against "off" on a 40 ms segment with the link emulator (~5 min).
.PHONY: bench-loops
bench-loops: $(STAMP)
	$(PY) tools/bench_loops.py

# Issue 13 (docs/OPS.md): the ops channel's figures, real processes over a lossy, rate-limited link (~1 min).
.PHONY: bench-ops
bench-ops: $(STAMP)
	$(PY) tools/bench_ops.py

# Issue 11's attack figures (real processes, ~5-7 min; QUICK=1: ~2 min).
.PHONY: bench-attack
bench-attack: $(STAMP)
	$(PY) tools/bench_attack.py $(if $(QUICK),--quick)

# Issue 10 (docs/MEMORY.md, docs/FIGURES.md): the heap budgets on the 32-bit
# builds (and the 64-bit wheel for reference), and speed on the emulated
# Cortex-M3; each prints one JSON object.
.PHONY: bench-board bench-qemu
bench-board: $(STAMP)
	$(PY) tools/bench_board.py

bench-qemu: $(STAMP)
	$(PY) tools/bench_qemu.py

demo: $(STAMP)
	$(PY) tools/demo.py

# Issue 13 (docs/UPDATE.md): code over the air at 5 % loss, the rollback
# scenarios and 20 power cuts (real processes, ~2 min); one JSON object.
# CLIENT=module:factory measures with another client (the ops channel).
.PHONY: bench-update
bench-update: $(STAMP)
	$(PY) tools/bench_update.py $(if $(CLIENT),--client $(CLIENT),--ops)

# Issue 12 (docs/FLEET.md): the fleet on etcd. Needs Debian's etcd-server
# (.ci/run installs it). bench-fleet: ~10 min (QUICK=1: ~2 min), one JSON object.
.PHONY: bench-fleet demo-fleet
bench-fleet: $(STAMP)
	$(PY) tools/bench_fleet.py $(if $(QUICK),--quick)

demo-fleet: $(STAMP)
	$(PY) tools/demo_fleet.py

# Firmware and deployment (docs/FIRMWARE.md).
#   make mpy      the portable package compiled to build/mpy/, with its size
#   make flash PORT=/dev/ttyACM0 DEVICE=sensor-1 [DEPLOY=deploy] [BOARD=rpi_pico_w]
#   LINES=1 on either: line numbers kept in tracebacks (mpy-cross without -O3)
DEPLOY ?= deploy
.PHONY: mpy flash

mpy: $(STAMP)
	@$(PY) -m microtun_host.flash mpy $(if $(LINES),--lines)

flash: $(STAMP)
	@test -n "$(PORT)" -a -n "$(DEVICE)" || { echo "usage: make flash PORT=/dev/ttyACM0 DEVICE=NAME [DEPLOY=deploy] [BOARD=board]"; exit 2; }
	$(PY) -m microtun_host.cli flash --port $(PORT) --device $(DEVICE) --config-dir $(DEPLOY) $(if $(BOARD),--board $(BOARD)) $(if $(LINES),--lines)

# MicroPython built from source (docs/FIRMWARE.md, "Build MicroPython with
# microtun frozen in"). MICROPY_SRC: a v1.28 checkout or the release tarball;
# default ../shared/micropython/micropython-1.28.0.tar.xz. Cached under build/.
.PHONY: unix32-frozen unix32 qemu qemu-pyaes
ifdef MICROPY_SRC
export MICROPY_SRC            # `make test MICROPY_SRC=...` reaches the suite's builds too
endif
MPBUILD = $(PY) tools/mpbuild.py

unix32-frozen unix32 qemu qemu-pyaes: $(STAMP)
	@$(MPBUILD) $@

clean:
	rm -rf $(VENV) build out .pytest_cache
