"""The SGLang-style worker (Dynamo's components/src/dynamo/sglang): args, engines, handlers, publisher."""
