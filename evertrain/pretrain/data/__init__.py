"""The data pipeline, one file per stage; each hands its output to the next.

Making a data dir (`evertrain data prepare` / `append`, driven by prepare.py):

    input files --sources.py--> documents --bpe.py--> a tokenizer (or a given one: tokenizer.py)
    documents --encode.py (tokenizer.py, in worker processes)--> tokens
    tokens --shards.py--> shard files + manifest.json (its types: stream.py)

Training on it (the loop):

    manifest.json --stream.py (+ stamps.py: checksums verified once per node)--> shards
    shards --order.py--> the epoch's order of windows (per source, interleaved by weight)
    windows --stream.py (TokenStream)--> batches --prefetch.py--> the device, read ahead
"""
