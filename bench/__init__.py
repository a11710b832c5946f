"""``make bench``: minipacs against its peers (Orthanc, DCMTK storescp), same run, same data.

Modules: ``datasets`` (generated, cached sets), ``cpu`` (CPU accounting over process sets),
``peers`` (storescp and Orthanc, started by the bench), ``target`` (a fresh minipacs stack),
``send`` (parallel DCMTK storescu runs), ``ingest`` (trials), ``report`` (table, markdown).
"""
