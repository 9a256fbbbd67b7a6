-- lib_task_id: prelude put in front of the scripts that must know a stored task's id
-- (fetch, ack, recover, release). Not a script on its own.
-- task_id_of(body, max_length): the "task_id" written in a JSON task body, or false.
-- A plain search instead of cjson.decode: a 1 MB body costs microseconds, not a parse.
-- Our bodies carry task_id first; the Semibot runtime's carry it at top level too.
local function task_id_of(body, max_length)
  local from = string.find(body, '"task_id"', 1, true)
  while from do
    local id = string.match(body, '^%s*:%s*"([%w_.:%-]+)"', from + 9)
    if id and #id <= max_length then
      return id
    end
    from = string.find(body, '"task_id"', from + 9, true)
  end
  return false
end

-- key_of(body, max_length): the id under which a body's delivery counts are kept: its task
-- id, or 'raw-<sha1>' for a body that has none.
local function key_of(body, max_length)
  local id = task_id_of(body, max_length)
  if id then
    return id
  end
  if redis.sha1hex then
    return 'raw-' .. redis.sha1hex(body)
  end
  -- fakeredis (the demo's embedded Redis) has no sha1hex: length and both ends instead
  return 'raw-' .. #body .. '-' .. string.gsub(string.sub(body, 1, 16) .. string.sub(body, -16),
    '[^%w]', '_')
end

-- redelivered(crashes, releases, id): deliveries of id lost to dead workers or given back.
local function redelivered(crashes, releases, id)
  return (tonumber(redis.call('HGET', crashes, id)) or 0)
    + (tonumber(redis.call('HGET', releases, id)) or 0)
end

-- set_status(state, id, word): the task's state becomes word, its session kept. A state
-- value is "<word> <session id>"; a body the Semibot runtime pushed raw has no session.
local function set_status(state, id, word)
  local value = redis.call('HGET', state, id)
  local session = value and string.match(value, '^%S* (.*)$') or ''
  redis.call('HSET', state, id, word .. ' ' .. session)
end

-- taken(K, bodies, max_length): bookkeeping of tasks a worker just took, with K the table
-- {crashes=, releases=, state=, cancel=}: each becomes "running", except one cancelled
-- before it ran (its state is gone: it has ended, and the worker drops it); returns, in
-- order, the earlier lost or given-back deliveries of each and 1 for each whose cancel
-- was asked.
local function taken(K, bodies, max_length)
  local counts, cancelled = {}, {}
  local redelivery = redis.call('EXISTS', K.crashes, K.releases) > 0
  local cancels = redis.call('EXISTS', K.cancel) > 0
  for i, body in ipairs(bodies) do
    local id = key_of(body, max_length)
    counts[i] = redelivery and redelivered(K.crashes, K.releases, id) or 0
    cancelled[i] = cancels and redis.call('HEXISTS', K.cancel, id) or 0
    if cancelled[i] == 0 or redis.call('HEXISTS', K.state, id) == 1 then
      set_status(K.state, id, 'running')
    end
  end
  return counts, cancelled
end
