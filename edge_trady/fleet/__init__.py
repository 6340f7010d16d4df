"""Fleet fine-tuning over Flower (Message API): many devices train one model, each sending only the
channel slices it updated (docs/fleet.md).

- ``aggregate``: per-entry weighted means of sparse updates (numpy only);
- ``protocol``: the records the server and the devices exchange;
- ``client`` / ``client_app``: one round on a device / its Flower ClientApp;
- ``server`` / ``server_app``: the rounds over a Flower Grid / the Flower ServerApp;
- ``state``: the server's run folder (resume); ``engines``: which engine trains;
- ``launch``: Flower's processes and files; ``partition``: per-node data for trials and benchmarks.

Nothing here is imported by the rest of the package: only ``edge-trady fleet`` needs Flower.
"""
