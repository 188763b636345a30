-- wrk script: POST one image as multipart field "file"; the path comes from the environment.
local f = assert(io.open(os.getenv("WRK_IMAGE"), "rb"))
local image = f:read("*a")
f:close()
local boundary = "cnnlabbenchboundary"
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
wrk.body = "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"image.jpg\"\r\n" ..
           "Content-Type: image/jpeg\r\n\r\n" .. image .. "\r\n--" .. boundary .. "--\r\n"
