"""Stand-ins for the modeling code that LLaDA, Dream and MDLM ship with their weights (not
installable offline): the released module paths, parameter shapes and forward signatures, each
file says which. core/standin.py builds them at real sizes (core/backbone_configs/) on the meta
device for the memory plan, or with random weights for a GPU check; tests/support/tiny_families.py
copies them into tiny checkpoints loaded through trust_remote_code, as the released files are."""
