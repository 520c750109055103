bring cloud;

// Does not compile: `nothing` is not defined.
let bucket = new cloud.Bucket();
nothing.happens();
