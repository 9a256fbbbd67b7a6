-- enqueue: push one or more tasks onto the pending list, all or none, within the limit.
-- Each task id gets an idempotency marker for IDEMPOTENCY_TTL holding this call's token:
-- the library repeating this same call after a lost reply finds its own token and
-- writes nothing again, while another call for an id still live is refused.
-- A marker '~<token>' is a tombstone a final outcome may leave instead of deleting the
-- marker: its own call's repeat is still a no-op, any other call may use the id again.
-- KEYS[1]     pending list
-- KEYS[2..]   one idempotency marker key per task, in the order of the tasks
-- ARGV[1]     MAX_QUEUE_LENGTH
-- ARGV[2]     seconds a marker lasts (IDEMPOTENCY_TTL)
-- ARGV[3]     this call's token
-- ARGV[4..]   encoded tasks, oldest first
-- Returns {new pending length}, {-1} when the new tasks do not fit, or {-2, positions}
-- (1-based) of the tasks whose id is live; nothing is written in the last two cases.
local token = ARGV[3]
local fresh, live, seen = {}, {}, {}
for i = 2, #KEYS do
  local marker = redis.call('GET', KEYS[i])
  if seen[KEYS[i]] then
    live[#live + 1] = i - 1
  elseif not marker then
    fresh[#fresh + 1] = i
  elseif marker ~= token and marker ~= '~' .. token then
    if string.sub(marker, 1, 1) == '~' then
      fresh[#fresh + 1] = i
    else
      live[#live + 1] = i - 1
    end
  end
  seen[KEYS[i]] = true
end
if #live > 0 then
  return {-2, unpack(live)}
end
if redis.call('LLEN', KEYS[1]) + #fresh > tonumber(ARGV[1]) then
  return {-1}
end
for _, i in ipairs(fresh) do
  redis.call('SET', KEYS[i], token, 'EX', tonumber(ARGV[2]))
  redis.call('LPUSH', KEYS[1], ARGV[i + 2])
end
return {redis.call('LLEN', KEYS[1])}
