"""The RWKV family (generations 4, 5, 5.1, 5.2, 6, 7): ``model.RWKV`` and its parts.

The generation modules and the block contract they share are described in ``generations``.
"""
