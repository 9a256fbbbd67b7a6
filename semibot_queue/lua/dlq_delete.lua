-- dlq_delete: remove one dead-letter record from every structure. (Prelude: lib_dead_letter.)
-- KEYS[1]  dead-letter hash
-- KEYS[2]  dead-letter index
-- KEYS[3]  dead-letter ids (lex)
-- KEYS[4]  dead-letter raw bytes
-- KEYS[5]  dead-letter sequence
-- ARGV[1]  record id
-- Returns 1 if the record existed, else 0.
local K = dead_keys(1)
local existed = remove_dead_letter(K, ARGV[1])
forget_if_empty(K)
return existed
