"""Shared pieces of splitmesh: wire contracts, spans, model store, crypto, codecs."""
