"""Hardware profiles, device detection, provisioning and broker credential files.

The modules here that run on a device use the standard library and
:mod:`protocol` only.
"""
