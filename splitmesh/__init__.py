"""splitmesh: adaptive split inference of language models across edge and cloud boxes.

``from splitmesh import Client`` streams generations from a running mesh.
"""

from splitmesh.client import AsyncClient, Client, SplitmeshError, TokenEvent

__all__ = ["AsyncClient", "Client", "SplitmeshError", "TokenEvent"]
