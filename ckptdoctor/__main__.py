"""``python -m ckptdoctor``."""

from .cli.app import main

main()
