"""``python -m ckptdoctor``."""

from ckptdoctor.cli.app import main

main()
