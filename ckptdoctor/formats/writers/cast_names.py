"""The dtypes ``convert --dtype`` casts between, by torch's name (apart from :mod:`.cast`, which needs numpy)."""

# Floating dtypes that are cast; every other dtype (integers, bool, float8, complex) never is.
CASTABLE = frozenset({"float64", "float32", "float16", "bfloat16"})
# --dtype spellings -> torch's name.
TARGETS = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
           "fp32": "float32", "float32": "float32", "float": "float32"}
