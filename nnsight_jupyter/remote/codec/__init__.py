"""The codec under `remote/protocol.py`, one concept per module.

- `body.py`: value trees to msgpack bodies and back (the extension types, paths in errors);
- `wire.py`: the wire's own value types (module references, records, placeholders, function sources);
- `arrays.py`: tensors and numpy arrays as dtype, shape and bytes;
- `functions.py`: a user's function as its source text;
- `memory.py`: fresh memory for large messages and values, in huge pages.

`protocol.py` is the public entry point; nothing here knows about requests, results or servers.
"""
