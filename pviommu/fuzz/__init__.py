"""Coverage-guided fuzzing of what a client or a guest reaches: wire parsers and state
machines, each driven in-process with real code over fake guest memory.

Every target module has ``one_input(data: bytes) -> None`` (atheris style): it decodes
the bytes into messages, requests or tables, feeds them to the real code, and raises
:class:`~pviommu.fuzz.common.Finding` (or lets an unexpected exception out) when the
code does what the spec does not allow. :mod:`pviommu.fuzz.registry` names the
targets; :mod:`pviommu.fuzz.engine` runs one under atheris (libFuzzer) or, without
it, under hypothesis.
"""
