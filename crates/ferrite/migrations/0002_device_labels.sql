-- Labels of a device: the line-protocol tags it last wrote (other than the
-- tag that names the device), as a JSON object of strings.
ALTER TABLE devices ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
