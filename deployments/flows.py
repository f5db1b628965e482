"""Entrypoints for prefect.yaml: the samplepipe flows, importable from a file.

`prefect deploy` loads entrypoints by file path; the flows themselves live in
the installed package.
"""

from samplepipe.flows import fit_pipeline, run_pipeline, transform_pipeline

__all__ = ["fit_pipeline", "run_pipeline", "transform_pipeline"]
