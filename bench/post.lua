-- wrk script: POST the body in $WRK_BODY_FILE with $WRK_CONTENT_TYPE (default JSON), when set
-- Accept: $WRK_ACCEPT, and any $WRK_HEADERS. Prints one line at the end:  WRKJSON {...}  (latencies in microseconds).
local path = os.getenv("WRK_BODY_FILE")
assert(path, "set WRK_BODY_FILE")
local f = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE") or "application/json"
local accept = os.getenv("WRK_ACCEPT")
if accept and accept ~= "" then wrk.headers["Accept"] = accept end
-- $WRK_HEADERS: more headers, one "Name: value" per line (a v2 binary body's header length).
for name, value in string.gmatch(os.getenv("WRK_HEADERS") or "", "([^:\n]+):%s*([^\n]*)") do
  wrk.headers[name] = value
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,' ..
    '"err_write":%d,"err_status":%d,"err_timeout":%d,"lat_mean_us":%.1f,"lat_max_us":%d,' ..
    '"p50_us":%d,"p95_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency.max, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency:percentile(99.9)))
end
