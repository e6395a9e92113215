"""Model specs: what a model expects (keys, shapes, dtypes, optionally digests), from any source.

``--against SPEC`` and ``ckptdoctor spec`` accept a model callable (:mod:`.user_code`, the one
place user code runs), a spec JSON (:mod:`.document`) or any checkpoint (:mod:`.resolve`).
Digests (:mod:`.digests`) pin released weights. The names below are the package's public face.
"""

from ckptdoctor.engines.spec.digests import check_digests, embedded_digest
from ckptdoctor.engines.spec.document import parse_spec_document, write_spec
from ckptdoctor.engines.spec.model_spec import DigestMismatch, ModelSpec, SpecKind, SpecTensor
from ckptdoctor.engines.spec.resolve import build_spec, load_spec

__all__ = ["DigestMismatch", "ModelSpec", "SpecKind", "SpecTensor", "build_spec", "check_digests",
           "embedded_digest", "load_spec", "parse_spec_document", "write_spec"]
