"""Built-in methods; importing this package registers them. Adding a method is adding one file here."""

from . import caldera, closed_form, gptq, loftq, odlri, rtn, srr  # noqa: F401
