"""The offline build of the compressed base: a teacher LM and a recipe in, a cached Hugging Face folder out.

``python -m compressor build`` (see ``__main__``); from Python, ``build_compressed_base(load_recipe(path))``,
``compressed_key(recipe)``, and ``prepare_base(spec)`` for the runners (any base spec to a folder). Devices and servers never run it: they load the folder it leaves
(``shared.base_model`` finds it by its recipe).
"""

from compressor.build import build_compressed_base, prepare_base
from compressor.cache import compressed_key
from compressor.recipe import load_recipe

__all__ = ["build_compressed_base", "compressed_key", "load_recipe", "prepare_base"]
