-- One round trip between a sidecar and the shared quota: heartbeat, optional change of the
-- shared controller state, and a lease of slots. Atomic, on Redis's own clock.
--
-- KEYS[1]  slot schedule: the theoretical arrival time (GCRA) in microseconds
-- KEYS[2]  shared controller state (hash: rate, state, ceiling, pause, version)
-- KEYS[3]  live sidecars (sorted set: member = instance id, score = last heartbeat)
-- KEYS[4]  requests waiting at each sidecar (hash: id -> "waiting:heartbeat")
-- ARGV     instance id, slots wanted, caller's effective rpm, safety margin, burst capacity,
--          lease horizon (us), change kind (none|slow|step), changed rate, state, ceiling,
--          pause (us from now), version the caller last saw, liveness window (us),
--          key lifetime (ms), requests waiting at the caller, how long (us) the schedule must
--          wait because the caller comes back from its local share (0: it does not), slots the
--          caller holds
--
-- Reply: live sidecars, shared rate ('' when none is shared), state, pause left (us),
--        ceiling, version, slot spacing (us), time to the next free slot (us), the horizon
--        used (us), then the start of every leased slot (us from now).

if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local id = ARGV[1]
local wanted = tonumber(ARGV[2])
local own_rpm = tonumber(ARGV[3])
local margin = tonumber(ARGV[4])
local capacity = tonumber(ARGV[5])
local horizon = tonumber(ARGV[6])
local kind = ARGV[7]
local seen = tonumber(ARGV[12])
local alive = tonumber(ARGV[13])
local keep_ms = tonumber(ARGV[14])
local waiting = tonumber(ARGV[15])
local rejoin_hold = tonumber(ARGV[16])
local held = tonumber(ARGV[17])

redis.call('ZADD', KEYS[3], now, id)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - alive)
redis.call('PEXPIRE', KEYS[3], keep_ms)
local live = redis.call('ZCARD', KEYS[3])

-- Waiting requests of every live sidecar: the slots of the horizon are shared in proportion,
-- so that the first sidecar to ask does not take them all.
redis.call('HSET', KEYS[4], id, string.format('%d:%d', waiting, now))
redis.call('PEXPIRE', KEYS[4], keep_ms)
local all_waiting = 0
local entries = redis.call('HGETALL', KEYS[4])
for i = 1, #entries, 2 do
  local count, seen_at = string.match(entries[i + 1], '^(%d+):(%d+)$')
  if count == nil or tonumber(seen_at) < now - alive then
    redis.call('HDEL', KEYS[4], entries[i])
  else
    all_waiting = all_waiting + tonumber(count)
  end
end

local c = redis.call('HMGET', KEYS[2], 'rate', 'state', 'ceiling', 'pause', 'version')
local rate = tonumber(c[1])
local state = tonumber(c[2]) or 0
local ceiling = tonumber(c[3]) or 0
local pause = tonumber(c[4]) or 0
local version = tonumber(c[5]) or 0

local changed = false
if kind == 'slow' then
  -- A cut or a pause applies at once and never raises the shared rate.
  local new_rate = tonumber(ARGV[8])
  if rate == nil or new_rate < rate then
    rate = new_rate
    state = tonumber(ARGV[9])
    ceiling = tonumber(ARGV[10])
  end
  local new_pause = tonumber(ARGV[11])
  if new_pause > 0 and now + new_pause > pause then
    pause = now + new_pause
  end
  changed = true
elseif kind == 'step' and seen == version then
  -- A recovery step only from a sidecar that knew the latest state: one step per interval,
  -- however many sidecars share the quota.
  rate = tonumber(ARGV[8])
  state = tonumber(ARGV[9])
  ceiling = tonumber(ARGV[10])
  changed = true
end
if changed then
  version = version + 1
  redis.call('HSET', KEYS[2], 'rate', tostring(rate), 'state', state,
    'ceiling', tostring(ceiling), 'pause', pause, 'version', version)
end
redis.call('PEXPIRE', KEYS[2], keep_ms)

local spacing_rpm = own_rpm
if rate ~= nil and rate < spacing_rpm then
  spacing_rpm = rate
end
local spacing = math.floor(60000000 / (spacing_rpm * (1 - margin)))
local tau = (capacity - 1) * spacing

-- At low rates the horizon holds less than one slot per sidecar, and the sidecars would race
-- for every slot: it reaches one slot per live sidecar (15 s at most) instead.
horizon = math.max(horizon, math.min(spacing * live, 15000000))

-- A sidecar coming back from its local share: the others may still be spending theirs, so
-- no slot opens before they have all come back.
if rejoin_hold > 0 then
  local hold = now + rejoin_hold + tau
  local tat = tonumber(redis.call('GET', KEYS[1])) or 0
  if tat < hold then
    redis.call('SET', KEYS[1], hold, 'PX', math.floor((hold - now) / 1000) + 1000)
  end
end

local slots = {}
local next_free
if pause > now then
  next_free = pause - now
else
  local tat = tonumber(redis.call('GET', KEYS[1])) or now
  if wanted > 0 and all_waiting > waiting then
    -- Each sidecar may hold its part of the slots the horizon holds, in proportion to its
    -- waiting requests (one at least); whoever asks first cannot take the others' part.
    local in_horizon = math.floor(horizon / spacing) + 1
    local part = math.max(1, math.floor(in_horizon * waiting / all_waiting))
    wanted = math.min(wanted, math.max(0, part - held))
  end
  while #slots < wanted do
    local start = math.max(now, tat - tau)
    if start > now + horizon then
      break
    end
    slots[#slots + 1] = start - now
    tat = math.max(tat, start) + spacing
  end
  if #slots > 0 then
    redis.call('SET', KEYS[1], tat, 'PX', math.floor((tat - now) / 1000) + 1000)
  end
  next_free = math.max(now, tat - tau) - now
end

local reply = { live, rate and tostring(rate) or '', state, math.max(pause - now, 0),
  tostring(ceiling), version, spacing, next_free, horizon }
for i = 1, #slots do
  reply[#reply + 1] = slots[i]
end
return reply
