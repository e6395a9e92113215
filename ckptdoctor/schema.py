"""The version of every JSON document ckptdoctor prints or writes (cli-contract.md: ``schema_version``).

One number for all documents (inspect, check, diff, scan, spec, fix): a field added is not a new
version; a field removed or changing meaning would be, and users' scripts check it.
"""

SCHEMA_VERSION = 1
