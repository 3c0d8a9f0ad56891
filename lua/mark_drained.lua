--[[
  Mark one stock bucket "the whole sale was found empty", so that its buyers are answered
  sold out at once (reserve_order) instead of each searching the other buckets. Written only
  if the bucket is still as it was seen when the sale was found empty: still no available
  units, and no units added since (`restocks` unchanged). Any unit added later (a release,
  deposit or import) clears the mark; otherwise it lapses at `until`.

  KEYS[1] sale hash of the bucket
  ARGV[1] `restocks` as seen when the sale was found empty   ARGV[2] until (ms)
  Returns 0 = marked, 1 = the bucket changed since: not marked   (mirrored by core.scripts.ReturnCode)
]]
local rcall = redis.call
local sale_key = KEYS[1]
local seen = rcall("HMGET", sale_key, "restocks", "available")
if tonumber(seen[1] or "0") ~= tonumber(ARGV[1]) or tonumber(seen[2] or "0") > 0 then
  return 1
end
rcall("HSET", sale_key, "drained_until", ARGV[2])
return 0
