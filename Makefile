# The one entry point. Each target is a script under scripts/ (which say what they need and
# install it), so `bash .ci/run` and the README's two commands keep working without make.
#   make build       the three binaries (debug)
#   make test        every test: the README's test command (scripts/test)
#   make ci          what CI runs on a clean clone (.ci/run: scripts/setup, then scripts/test)
#   make quickstart  the main job on the embedded defaults (scripts/quickstart)
#   make bench       the headline benchmarks of BENCHMARKS.md (about 10 minutes)
#   make chart       the Helm chart rendered, linted and validated (scripts/check-chart)
#   make policy      the admission policies checked against the chart and bad pods (scripts/check-policy)
#   make supply      secret scan, cargo deny, workflow lint (scripts/check-supply-chain)
#   make sbom        binaries, images and their SBOMs in dist/ (validated, unsigned)
#   make release     dist/: binaries, images, chart, SBOMs, signed provenance (RELEASING.md)
#   make verify      checks dist/ against the release key and this revision (RELEASE_PUB=...)
.POSIX:
.PHONY: build test ci quickstart bench chart policy supply sbom release verify clean

build:
	cargo build --workspace --bins --locked

test:
	bash scripts/test

ci:
	bash .ci/run

quickstart:
	bash scripts/quickstart

# The headline figure of each benchmark with the arguments BENCHMARKS.md records; run a
# script by hand for the others (each says its arguments at the top).
bench:
	bash scripts/bench-ingest embedded 1000 2 50 30
	bash scripts/bench-ingest clickhouse 1000 2 50 30
	bash scripts/bench-decide 1000 100 40
	bash scripts/bench-kube 1000 100 40 4
	bash scripts/bench-agent 300

chart:
	bash scripts/check-chart

policy:
	bash scripts/check-policy

supply:
	bash scripts/check-supply-chain

sbom:
	bash scripts/release sbom

release:
	bash scripts/release

verify:
	bash scripts/release verify

clean:
	rm -rf dist
