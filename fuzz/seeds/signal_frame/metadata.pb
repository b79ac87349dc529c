z
mn
kv 