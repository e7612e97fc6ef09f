"""Thin ZenML steps: unpack one config object, call `ecomcap`, return typed `Annotated` outputs.

Filled by the pipeline issue.
"""
