-- What the sidecars sharing one key learned per model: each reports the lanes that hold a
-- model back, and reads back, per model, the most careful report of those still fresh (the
-- lowest rate, with its state and ceiling, and the longest pause). A cut by one sidecar so
-- reaches all at their next round trip; a recovery step counts once every sidecar took it.
-- Atomic, on Redis's own clock.
--
-- KEYS[1]  reports (hash: "<model>|<instance>" -> "rate|state|ceiling|pause_until_us|at_us")
-- ARGV     instance id, freshness (us), key lifetime (ms), number of reports, then per report:
--          model, rate, state, ceiling, pause (us from now)
--
-- Reply: per model, flat: model, rate, state, ceiling, pause left (us).

if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local id = ARGV[1]
local fresh = tonumber(ARGV[2])
local keep_ms = tonumber(ARGV[3])
local n = tonumber(ARGV[4])

-- This sidecar's reports are replaced whole: a lane it no longer reports holds nothing back.
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local _, instance = string.match(entries[i], '^(.*)|([^|]*)$')
  if instance == id then
    redis.call('HDEL', KEYS[1], entries[i])
  end
end
for i = 0, n - 1 do
  local b = 5 + i * 5
  local pause = tonumber(ARGV[b + 4]) or 0
  redis.call('HSET', KEYS[1], ARGV[b] .. '|' .. id,
    string.format('%s|%s|%s|%d|%d', ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], now + pause, now))
end
if n > 0 then
  redis.call('PEXPIRE', KEYS[1], keep_ms)
end

local best = {}
local order = {}
entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local model = string.match(entries[i], '^(.*)|[^|]*$')
  local rate, state, ceiling, pause_until, at =
    string.match(entries[i + 1], '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  rate, pause_until, at = tonumber(rate), tonumber(pause_until), tonumber(at)
  if model == nil or rate == nil or pause_until == nil or at == nil or at < now - fresh then
    -- Stale, or not written by a sidecar: dropped.
    redis.call('HDEL', KEYS[1], entries[i])
  else
    local b = best[model]
    if b == nil then
      order[#order + 1] = model
      best[model] = { rate = rate, state = state, ceiling = ceiling, pause = pause_until }
    else
      if rate < b.rate then
        b.rate, b.state, b.ceiling = rate, state, ceiling
      end
      if pause_until > b.pause then
        b.pause = pause_until
      end
    end
  end
end

local reply = {}
for _, model in ipairs(order) do
  local b = best[model]
  reply[#reply + 1] = model
  reply[#reply + 1] = tostring(b.rate)
  reply[#reply + 1] = b.state
  reply[#reply + 1] = b.ceiling
  reply[#reply + 1] = math.max(b.pause - now, 0)
end
return reply
