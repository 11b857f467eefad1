"""A secured deployment: who may publish and read what (broker ACLs by role), the mosquitto
configuration that enforces it, a lab PKI and passwords, written by ``iotoffload security
init``. Pure text generation (``acl``, ``mosquitto``) is apart from the files (``lab``)."""
