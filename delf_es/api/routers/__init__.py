"""One router per resource; :mod:`delf_es.api.app` composes them."""
