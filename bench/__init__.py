"""Benchmarks and GPU checks of minigemini-serve: developer tooling, not shipped in the wheel or the images.

    python -m bench.kernels_cpu      # patch info mining on CPU (kernels/)
    python -m bench.encoder          # vision front end, official path against ours (engine/)
    python -m bench.serving          # the serving stack against the official serving path (loadtests/ drives it)
    python -m bench.report           # BENCHMARKS.md from the stored results in bench/results/
    bash bench/gpu_check.sh OUT      # every GPU measurement in one call; then python -m bench.report --from OUT

Each benchmark writes its measurements to bench/results/*.json and renders its BENCHMARKS.md sections through
bench.report, the one renderer; `make bench` runs the CPU benchmarks and re-renders the stored GPU results.
"""
